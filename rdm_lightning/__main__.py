from rdm_lightning.cli import main

main()
