"""The maps stage: where on a slice an SAE feature fires (issue 17)."""
