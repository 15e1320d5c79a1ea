from fastsam_backend.cli import main

main()
