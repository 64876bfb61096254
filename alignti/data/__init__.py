"""alignti.data"""
