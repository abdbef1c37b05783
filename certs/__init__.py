"""Key and SSH-certificate tooling; generated keys live in this folder and are never committed."""
