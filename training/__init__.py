"""Training layer: pair data, contrastive losses and the trainer that writes encoder directories."""
