"""Stage backends. Each module registers its classes in ``datagen.registry``."""
