"""``safedl gameday``: scripted fault and attack scenarios against a local deployment it starts itself."""
