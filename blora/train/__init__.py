"""Training: the recipe and its config, algorithms, AdaLoRA, stacked seeds, the training set, images and augmentation, the loss history."""
