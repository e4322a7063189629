"""Fashion-MNIST (real data, no network): a loader, two FP models and their experiment tasks."""
