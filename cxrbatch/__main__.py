from cxrbatch.cli import main

main()
