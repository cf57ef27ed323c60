"""Consent records, the agency decision API, receipts, the audit ledger, officer views."""
