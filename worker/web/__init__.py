"""The HTTP side: producer API (/v1), kod.mobi callbacks, health."""
