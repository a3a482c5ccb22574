"""Generated protobuf and gRPC code for the splitdet wire (package splitdet.v1).

Do not edit: regenerate with `make proto` (proto/generate.py) from proto/splitdet/v1/*.proto.
"""
