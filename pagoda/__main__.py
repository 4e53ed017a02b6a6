import sys

from pagoda.server.cli import main

if __name__ == "__main__":
    # `python -m pagoda` is the `pagoda` command; `serve` may be left out (but `--help` alone
    # or `--version` alone are the command's own)
    args = sys.argv[1:]
    implied = not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"))
    main(["serve", *args] if implied else args)
