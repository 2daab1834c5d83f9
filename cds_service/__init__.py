"""cds_service"""
