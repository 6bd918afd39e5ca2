"""Stochastic-average-pooling (SAP) ResNets for timm."""
