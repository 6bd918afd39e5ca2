"""Real data that ships with the machine: Fashion-MNIST and the Fashion-scenes segmentation set."""
