from fc2conv_cli.cli import main

main()
