from soci.cli.main import main

main()
