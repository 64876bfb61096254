"""alignti.extract"""
