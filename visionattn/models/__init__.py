"""visionattn model families; importing this package registers every model in timm."""
