"""policy_svc"""
