"""Records, video decoding, transforms, annotation formats, synthetic videos and perturbations."""
