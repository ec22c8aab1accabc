from sail.cli import main

main()
