"""alignti.distill"""
