"""``python -m search_client`` / ``torchrun --nproc_per_node N -m search_client``."""

from search_client.cli import main

main()
