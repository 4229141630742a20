"""ppm_svc"""
