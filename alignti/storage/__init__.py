"""alignti.storage"""
