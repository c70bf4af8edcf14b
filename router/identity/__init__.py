"""Who is calling: principals, router-issued tokens, JWKS-verified service-account tokens.

Verification lives here; the identity middleware only extracts the credential and puts the
verified principal in the request scope (SPEC.md §1).
"""
