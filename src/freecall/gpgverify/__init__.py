"""freecall.gpgverify"""
