from marrowlens.cli import main

main()
