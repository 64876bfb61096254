"""alignti.eval"""
