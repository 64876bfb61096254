"""alignti.models"""
