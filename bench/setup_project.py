"""Run inside the project (``python -m bench.setup_project``): make the benchmark's users.

Prints JSON: an ``owner`` and ``watchers``, each with a user id and an access token minted
with the project's own signing key. All are staff, so each may watch any task and the owner
may broadcast. Passwords are left unusable: nobody logs in, and hashing thousands of
passwords would only slow the set-up.
"""

import argparse
import json

import django


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, required=True)
    args = parser.parse_args()
    django.setup()

    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    model = get_user_model()
    names = ["bench-owner", *(f"bench-watcher-{i}" for i in range(args.watchers))]
    users = []
    for name in names:
        user = model(username=name, is_staff=True)
        user.set_unusable_password()
        users.append(user)
    model.objects.bulk_create(users)
    saved = {user.username: user for user in model.objects.filter(username__in=names)}
    accounts = [
        {"id": saved[name].pk, "token": str(AccessToken.for_user(saved[name]))} for name in names
    ]
    print(json.dumps({"owner": accounts[0], "watchers": accounts[1:]}))


if __name__ == "__main__":
    main()
