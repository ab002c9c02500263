"""
Who may log in: Twisted Cred checkers and the password schemes they verify.

L{popd.auth.schemes} reads and writes Dovecot's C{{SCHEME}data} password
values, L{popd.auth.passwdfile} serves a Dovecot passwd-file through Cred,
and L{popd.auth.credentials} holds the POP3-specific credentials (APOP).
"""
