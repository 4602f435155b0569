# `make run` serves http://127.0.0.1:8000 (`make run PORT=8001` for another port) on the
# embedded defaults (SQLite, in-process channel layer); `make test` runs the whole suite.
# Both install what is missing first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEV_ENV := DJANGO_DEBUG=$${DJANGO_DEBUG:-1}
PORT ?= 8000

.PHONY: install run test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

run: install
	$(DEV_ENV) $(BIN)/python manage.py migrate --noinput
	$(DEV_ENV) $(BIN)/python manage.py demo_setup --url http://127.0.0.1:$(PORT)
	$(DEV_ENV) $(BIN)/python -m mcp_platform.serve -b 127.0.0.1 -p $(PORT) mcp_platform.asgi:application

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache db.sqlite3 test_db.sqlite3
