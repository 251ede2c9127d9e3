from meshshard.cli import main

main()
