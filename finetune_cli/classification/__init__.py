"""Classification fine-tuning: labels, inputs, the classifier model, predictions and their metrics."""
