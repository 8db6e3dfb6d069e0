"""The metric implementations behind metrics.py: our BERT encoder, BERTScore's matching, the Meteor 1.5 jar's algorithm."""
