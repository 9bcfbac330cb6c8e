def main():
    from vlsplit.shared import errors
    print("ok", errors)
