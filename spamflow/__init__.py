"""spamflow: spam detection from TCP flow behaviour, beside SpamAssassin."""

__version__ = "0.1.0"
