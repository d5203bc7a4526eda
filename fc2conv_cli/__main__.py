from fc2conv_cli.cli import main

# Guarded: batch workers re-import the main module when they start.
if __name__ == "__main__":
    main()
