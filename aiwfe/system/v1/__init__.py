"""Generated protobuf package (see protos/)."""
