from bench.reference.server import main

main()
