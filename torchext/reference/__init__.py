"""Pure-PyTorch references written from each paper's equations: the ground truth and the CPU path."""
