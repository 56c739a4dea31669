from trimformer.cli import main

main()
