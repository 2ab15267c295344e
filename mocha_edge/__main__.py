from mocha_edge.cli import main

main()
