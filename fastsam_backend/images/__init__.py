"""Task images: fetched (every hop through the outbound policy), decoded, digested."""
