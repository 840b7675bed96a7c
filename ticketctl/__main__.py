from ticketctl.cli.app import main

main()
