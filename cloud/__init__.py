"""The cloud detection server: RPN + ROI heads behind gRPC."""
