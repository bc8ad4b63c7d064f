"""Card and chat templates shipped with releaser (found through releaser.resources.templates_dir)."""
