"""Wire contract: the .proto files and their generated Python stubs (see protos/README.md)."""
