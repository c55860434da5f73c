"""The benchmark (`python -m train.bench`): one module per section over shared helpers (`common`) and profiles;
sections never import each other or the entry point (`main`)."""
