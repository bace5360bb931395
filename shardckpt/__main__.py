from shardckpt.cli.main import main

main()
