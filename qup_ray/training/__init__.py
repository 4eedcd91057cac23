"""Training pieces of the train stage: data (examples, batches), the Ray Train worker loop."""
